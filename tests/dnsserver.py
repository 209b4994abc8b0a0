"""A DNS server on loopback for the tests: answers from a dict of records,
NXDOMAIN for any other name, and counts the questions it was asked."""
from __future__ import annotations

import collections
import socket
import threading

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class DnsServer:
    def __init__(self, ttl: int = 60):
        self.ttl = ttl
        self.records: dict[tuple[str, str], list[str]] = {}   # (name., type) -> rdata texts
        self.asked: collections.Counter = collections.Counter()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.addr = self.sock.getsockname()
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def spec(self) -> str:
        """For proxy.dns_servers."""
        return f"{self.addr[0]}:{self.addr[1]}"

    def srv(self, name: str, *records: tuple[int, int, int, str]) -> None:
        """SRV records of `name` (`_sip._udp.trunk.test`): (priority,
        weight, port, target) each."""
        self.add(name, "SRV", *(f"{prio} {weight} {port} {target.rstrip('.')}."
                                for prio, weight, port, target in records))

    def naptr(self, name: str, *records: tuple[int, int, str, str]) -> None:
        """NAPTR records of `name`: (order, preference, service, SRV name)
        each, with the "s" flag and no regexp (RFC 3263 §4.1)."""
        self.add(name, "NAPTR", *(f'{order} {pref} "s" "{service}" "" {srv.rstrip(".")}.'
                                  for order, pref, service, srv in records))

    def add(self, name: str, rtype: str, *rdata: str) -> None:
        """Records of any type (`"AAAA", "::1"`), as zone-file rdata."""
        self.records[(name.rstrip(".") + ".", rtype)] = list(rdata)

    def _serve(self) -> None:
        while not self._stop:
            try:
                data, peer = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:
                continue
            question = query.question[0]
            name, rtype = question.name.to_text(), dns.rdatatype.to_text(question.rdtype)
            self.asked[(name, rtype)] += 1
            reply = dns.message.make_response(query)
            found = self.records.get((name, rtype))
            if found:
                reply.answer.append(dns.rrset.from_text_list(question.name, self.ttl, "IN", rtype, found))
            elif not any(n == name for n, _ in self.records):
                reply.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(reply.to_wire(), peer)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()
