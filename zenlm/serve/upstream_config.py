"""What an upstream is and how it is configured: ``Upstream`` (its replicas, options, HTTP client,
busy-time clock and counts) and ``Replica``, built from ``zenlm serve --upstream NAME=URL...``
(``parse_upstream``), from a YAML catalog (``--catalog``, ``load_catalog``) or by a managed engine
(``engines.py``), all through one validating ``make_upstream``. The gateway that uses them, the
dispatch, relay and health checks, is ``upstream.py``."""
from __future__ import annotations

import collections
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Optional

from .billing import to_micros

try:  # the openai client brings one of the two (openai 3 depends on httpx2, older ones on httpx)
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    try:
        import httpx
    except ImportError:
        httpx = None

log = logging.getLogger("zenlm.serve.upstream")


# --------------------------------------------------------------------------- configuration
@dataclass
class Replica:
    url: str
    outstanding: int = 0
    down_until: float = 0.0
    failures: int = 0
    # processor-sharing clock: seconds of busy time per request in flight, summed (see Upstream.busy_share)
    share_s: float = 0.0
    changed: float = field(default_factory=time.monotonic)
    busy_s: float = 0.0  # wall time with at least one request in flight
    requests: int = 0  # answered (whole or streamed to the end)
    completion_tokens: int = 0
    latencies: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1024))

    def advance(self) -> None:
        now = time.monotonic()
        if self.outstanding:
            self.share_s += (now - self.changed) / self.outstanding
            self.busy_s += now - self.changed
        self.changed = now

    def stats(self) -> dict:
        """p50/p99 latency (s) of the last 1,024 answers and completion tokens per busy second."""
        lat = sorted(self.latencies)

        def pick(q: float) -> Optional[float]:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 4) if lat else None

        return {"requests": self.requests, "completion_tokens": self.completion_tokens,
                "p50_s": pick(0.5), "p99_s": pick(0.99),
                "tokens_per_s": round(self.completion_tokens / self.busy_s, 2) if self.busy_s > 0 else None}


@dataclass
class Upstream:
    name: str
    replicas: list[Replica]
    remote_model: Optional[str] = None  # the model name the upstream knows (default: NAME)
    timeout_s: float = 60.0
    concurrency: int = 64
    price_micros_per_hour: int = 0
    max_tokens: int = 4096  # the completion cap sent upstream when the client gives none
    eject_s: float = 5.0
    health_s: float = 5.0  # seconds between health checks of its replicas
    tokenizer: Optional[object] = None
    tokenizer_path: Optional[str] = None
    api_key: Optional[str] = None  # sent upstream as "Authorization: Bearer ..." (api_key_env=VAR)
    in_flight: int = 0
    client: Optional[object] = None
    metrics: Optional[tuple] = None  # (requests, tokens, latency) series, from instrument()

    def http(self):
        if self.client is None:
            t = self.timeout_s
            headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else None
            self.client = httpx.AsyncClient(timeout=httpx.Timeout(t, connect=min(t, 5.0)), headers=headers,
                                            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        return self.client

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def order(self) -> list[Replica]:
        """Replicas to try, in order: the admitted ones by fewest requests in flight (ties as
        given), then the ejected ones (better than refusing when they may be back)."""
        now = time.monotonic()
        up = sorted((r for r in self.replicas if r.down_until <= now), key=lambda r: r.outstanding)
        return up + sorted((r for r in self.replicas if r.down_until > now), key=lambda r: r.down_until)

    def begin(self, replica: Replica) -> float:
        replica.advance()
        replica.outstanding += 1
        return replica.share_s

    def end(self, replica: Replica, start_share: float) -> int:
        """The request's share of the replica's busy time, in ms."""
        replica.advance()
        replica.outstanding -= 1
        return int(round((replica.share_s - start_share) * 1000))

    def record(self, replica: Replica, seconds: float, completion_tokens: int) -> None:
        """An answered request: its latency and tokens, for /admin/upstreams and /metrics."""
        replica.requests += 1
        replica.completion_tokens += completion_tokens
        replica.latencies.append(seconds)
        if self.metrics is not None:
            requests, tokens, latency = self.metrics
            requests.labels(self.name, replica.url).inc()
            tokens.labels(self.name, replica.url).inc(completion_tokens)
            latency.labels(self.name, replica.url).observe(seconds)

    def cost(self, busy_ms: int) -> int:
        return -(-int(busy_ms) * self.price_micros_per_hour // 3_600_000)

    def ok(self, replica: Replica) -> None:
        replica.failures, replica.down_until = 0, 0.0

    def eject(self, replica: Replica, why: str) -> None:
        replica.failures += 1
        replica.down_until = time.monotonic() + self.eject_s
        log.warning("upstream %s replica %s set aside for %.0fs: %s", self.name, replica.url, self.eject_s, why)

    def count(self, text: str) -> Optional[int]:
        """Tokens in ``text`` as the model's tokenizer makes them (no special tokens added): for a
        reply, exactly what was delivered."""
        if self.tokenizer is None:
            return None
        return len(self.tokenizer.encode(text))

    def count_prompt(self, messages: Optional[list], text: str) -> Optional[int]:
        """Prompt tokens: a chat's ``messages`` rendered through the tokenizer's chat template when it
        has one (as the upstream renders them), else ``text`` (the messages' or prompts' text)."""
        if self.tokenizer is None:
            return None
        if messages is not None and getattr(self.tokenizer, "has_chat_template", False):
            try:
                return len(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                              tokenize=True, return_dict=False))
            except Exception:  # a template that refuses these messages: the upstream said yes, so count the text
                log.debug("upstream %s: chat template refused the messages; counting their text", self.name)
        return self.count(text)


# the options of an upstream, on the command line (``;key=value``) and in a catalog (``key: value``)
OPTIONS = ("timeout", "concurrency", "price", "model", "max_tokens", "tokenizer", "eject", "health", "api_key_env")
# the numeric ones: (Upstream attribute, type, must be > 0)
_NUMBERS = {"timeout": ("timeout_s", float, True), "concurrency": ("concurrency", int, True),
            "max_tokens": ("max_tokens", int, True), "eject": ("eject_s", float, False),
            "health": ("health_s", float, True)}


def make_upstream(name: str, urls: list, options: dict, where: Optional[str] = None) -> Upstream:
    """An Upstream from its name, replica URLs and options (``OPTIONS``; values as text or as YAML
    gives them), validated: a bad one is a ValueError that starts with ``where`` (the flag or the
    catalog entry) and names the key and the value. URLs are the servers' roots (``http://host:port``;
    a trailing ``/v1`` is dropped); the upstream's key comes from the environment variable that
    ``api_key_env`` names, never from the command line or the file."""
    if httpx is None:  # pragma: no cover
        raise ValueError("the gateway needs an async HTTP client: pip install httpx2 (or the openai client)")
    where = where or f"upstream {name!r}"
    if not isinstance(name, str) or not name.strip() or len(name) > 128:
        raise ValueError(f"{where}: the name must be 1-128 characters, got {name!r}")
    if not urls:
        raise ValueError(f"{where}: give at least one URL")
    replicas = []
    for url in urls:
        if not isinstance(url, str):
            raise ValueError(f"{where}: URL {url!r} is not text")
        url = url.strip().rstrip("/")
        if url.endswith("/v1"):
            url = url[:-3]
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{where}: {url!r} is not an http(s):// URL")
        replicas.append(Replica(url))
    up = Upstream(name, replicas)
    tokenizer = None
    for k, v in options.items():
        if k not in OPTIONS:
            raise ValueError(f"{where}: unknown option {k!r} ({', '.join(OPTIONS)})")
        bad = ValueError(f"{where}: bad value for {k}: {v!r}")
        if isinstance(v, bool) or v is None:
            raise bad
        if k in _NUMBERS:
            attribute, kind, positive = _NUMBERS[k]
            try:
                value = kind(v)
            except (TypeError, ValueError):
                raise bad from None
            # 2.5 (or "2.5") is no concurrency: an int option must read back as what was given
            if (kind is int and str(v).strip() != str(value)) or value < 0 or (positive and value == 0):
                raise bad
            setattr(up, attribute, value)
        elif k == "price":  # YAML reads 0.90 as a float: its shortest text is the decimal written
            try:
                up.price_micros_per_hour = to_micros(str(v))
            except ValueError as e:
                raise ValueError(f"{where}: bad value for price (per hour and replica): {e}") from None
        elif k == "model":
            up.remote_model = str(v) or None
        elif k == "tokenizer":
            tokenizer = str(v)
        elif k == "api_key_env":
            up.api_key = os.environ.get(str(v))
            if not up.api_key:
                raise ValueError(f"{where}: api_key_env={v} but ${v} is not set")
    if tokenizer:
        try:
            up.tokenizer, up.tokenizer_path = counting_tokenizer(tokenizer), tokenizer
        except (OSError, ValueError) as e:
            raise ValueError(f"{where}: tokenizer {tokenizer!r}: {e}") from None
    return up


def parse_upstream(spec: str, tokenizers: Optional[dict] = None) -> Upstream:
    """``NAME=URL[,URL...][;timeout=S][;concurrency=N][;price=PER_HOUR][;model=REMOTE][;max_tokens=N]
    [;tokenizer=FOLDER|FILE.gguf][;eject=S][;health=S][;api_key_env=VAR]`` (``zenlm serve --upstream``);
    ``tokenizers``: NAME -> tokenizer path (``--upstream-tokenizer``), overridden by the spec's own."""
    head, *parts = [p.strip() for p in spec.split(";")]
    name, sep, urls = head.partition("=")
    if not sep or not name or not urls:
        raise ValueError(f"--upstream must look like NAME=URL[,URL...], got {spec!r}")
    options = {}
    if (tokenizers or {}).get(name):
        options["tokenizer"] = tokenizers[name]
    for part in parts:
        if part:
            k, _, v = part.partition("=")
            options[k] = v
    return make_upstream(name, urls.split(","), options, f"--upstream {name}")


def load_catalog(path) -> list[Upstream]:
    """The upstreams of a YAML catalog (``zenlm serve --catalog FILE``)::

        upstreams:
          - name: llama-8b                 # the model name clients ask for
            urls: [http://10.0.0.5:8080, http://10.0.0.6:8080]   # or url: one
            timeout: 30                    # seconds, connect and between bytes
            concurrency: 16                # requests in flight at once in this gateway process (503 beyond)
            price: 0.90                    # the hardware's cost per hour and replica
            tokenizer: models/llama-8b     # a folder or .gguf that counts tokens when the upstream reports none
            model: meta-llama/Llama-3.1-8B # the name the upstream knows (default: name)

    and ``max_tokens``, ``eject``, ``health``, ``api_key_env`` as for ``--upstream``. Every problem
    is a ValueError naming the file, the entry, the key and the value."""
    import yaml

    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no catalog file at {path}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"catalog {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict) or set(data) != {"upstreams"} or not isinstance(data["upstreams"], list):
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"catalog {path} must be a mapping with one key, 'upstreams', holding a list; got {keys}")
    ups, seen = [], set()
    for i, entry in enumerate(data["upstreams"]):
        where = f"catalog {path}: upstreams[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a mapping (name:, urls:, ...), got {entry!r}")
        entry = dict(entry)
        name = entry.pop("name", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where} has no name (name: the model name clients ask for)")
        where += f" ({name})"
        if name in seen:
            raise ValueError(f"{where}: the name {name!r} is given twice")
        seen.add(name)
        if ("url" in entry) == ("urls" in entry):
            raise ValueError(f"{where}: give either url: or urls:, got {sorted(k for k in entry if 'url' in k) or 'neither'}")
        urls = entry.pop("url", None) or entry.pop("urls", None)
        urls = [urls] if isinstance(urls, str) else urls
        if not isinstance(urls, list) or not urls:
            raise ValueError(f"{where}: urls must be a URL or a non-empty list of URLs, got {urls!r}")
        ups.append(make_upstream(name, urls, entry, where))
    if not ups:
        raise ValueError(f"catalog {path} lists no upstreams")
    return ups


def counting_tokenizer(path: str):
    """The tokenizer that counts an upstream's tokens: a model folder's tokenizer.json, or the one
    inside a GGUF file (read from its metadata alone, without the weights)."""
    if str(path).lower().endswith(".gguf"):
        import gguf

        from ..gguf import _tokenizer_from_gguf, read_metadata  # the file's vocabulary, not its tensors

        if not os.path.isfile(path):
            raise FileNotFoundError(f"no GGUF file at {path}")
        return _tokenizer_from_gguf(read_metadata(gguf.GGUFReader(str(path))))
    from ..folders import load_tokenizer

    return load_tokenizer(path)


__all__ = ["OPTIONS", "Replica", "Upstream", "counting_tokenizer", "load_catalog", "make_upstream", "parse_upstream"]
