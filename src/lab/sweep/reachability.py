"""Whether the MLflow tracking server is there, said while it is not.

MLflow's client waits out a server that went away by itself (it retries each request for about two minutes:
25 s and 170 s outages lost nothing), but silently: the live view froze without a word. A thread asks an
http(s) server's /health every EVERY_S seconds and says "tracking server unreachable since HH:MM:SS, retrying"
in the log when it stops answering, and again when it is back; the live view shows the line meanwhile.
A local store (sqlite:///) has no server to lose: no thread.
"""
import logging
import threading
import time
import urllib.error
import urllib.request

from lab.uris import mask_password

log = logging.getLogger(__name__)
EVERY_S = 2.0
TIMEOUT_S = 2.0
GATEWAY_DOWN = (502, 503, 504)  # a proxy in front of a server that is gone


def probe(uri: str) -> str | None:
    """None when the server answers; else why not, in a few words."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=TIMEOUT_S):
            return None
    except urllib.error.HTTPError as err:  # it answered: reachable, unless a gateway says the server is gone
        return f"HTTP {err.code}" if err.code in GATEWAY_DOWN else None
    except (urllib.error.URLError, OSError) as err:
        return str(getattr(err, "reason", err))


class TrackingWatch:
    def __init__(self, uri: str, every_s: float = EVERY_S):
        self.uri, self.every_s = uri, every_s
        self.since: float | None = None
        self.why = ""
        if uri.startswith(("http://", "https://")):
            threading.Thread(target=self._watch, name="lab-tracking-watch", daemon=True).start()

    def _watch(self) -> None:
        while True:
            why = probe(self.uri)
            if why and self.since is None:
                self.since, self.why = time.time(), why
                log.warning(self.notes()[0])
            elif why is None and self.since is not None:
                log.warning("tracking server %s reachable again after %.0f s", mask_password(self.uri),
                            time.time() - self.since)
                self.since = None
            time.sleep(self.every_s)

    def notes(self) -> list[str]:
        """The live view's line while the server is away; none otherwise."""
        if self.since is None:
            return []
        when = time.strftime("%H:%M:%S", time.localtime(self.since))
        return [f"tracking server unreachable since {when}, retrying ({mask_password(self.uri)}: {self.why})"]
