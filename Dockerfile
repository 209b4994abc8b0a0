# The one image every sipha service runs: `sipha proxy` or `sipha node`,
# configured by SIPHA_* environment variables (see README, Configuration).
FROM python:3.11-slim
WORKDIR /opt/sipha
COPY pyproject.toml README.md ./
COPY sipcore ./sipcore
COPY proxy ./proxy
COPY node ./node
COPY sipha ./sipha
COPY sipp_scenarios ./sipp_scenarios
RUN pip install --no-cache-dir . && useradd --system --no-create-home sipha
USER sipha
ENTRYPOINT ["sipha"]
