# The one image every sipha service runs: `sipha proxy` or `sipha node`,
# configured by SIPHA_* environment variables (see README, Configuration).

# The hot modules compiled (`sipha compile`), where a C compiler is at hand.
# They are used only while they match the source installed beside them,
# byte for byte, so the image takes its source from this stage too.
FROM python:3.11 AS compiled
WORKDIR /opt/sipha
COPY pyproject.toml README.md ./
COPY sipcore ./sipcore
COPY proxy ./proxy
COPY node ./node
COPY sipha ./sipha
RUN pip install --no-cache-dir '.[fast]' && SIPHA_COMPILED=/opt/compiled sipha compile

FROM python:3.11-slim
WORKDIR /opt/sipha
COPY --from=compiled /opt/sipha ./
COPY sipp_scenarios ./sipp_scenarios
RUN pip install --no-cache-dir . && useradd --system --no-create-home sipha
COPY --from=compiled /opt/compiled /opt/sipha/compiled
ENV SIPHA_COMPILED=/opt/sipha/compiled
USER sipha
ENTRYPOINT ["sipha"]
