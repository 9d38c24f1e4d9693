"""Fixed text of a run report (see :mod:`fl_server.reports`).

The HTML page is self-contained: inline CSS, images by relative file name, no scripts, no CDN.
Every ``{placeholder}`` is filled with already HTML-escaped text.
"""

from __future__ import annotations

NO_DP_SENTENCE = "This run used no differential privacy: no (epsilon, delta) guarantee is claimed."
FEDERATED_DATA_SENTENCE = "Raw training data never left the clients: only model updates were exchanged."
CENTRALIZED_DATA_SENTENCE = ("This was a centralized baseline: the training data was pooled in one place, "
                             "so no statement about data staying on clients applies.")
UNKNOWN_MODE_SENTENCE = "summary.json does not record the run's mode: no statement about where the data was is made."
#: REST runs: what the server received instead of data ({metrics}: " (name, ...)" of the metric names seen, or "")
REST_DATA_SENTENCE = ("Raw training data never left the clients: the server received model updates, each with its sample "
                      "count and the per-update metrics the client attached{metrics}.")
DP_UNRECORDED_SENTENCE = ("Differential privacy was configured (differential_privacy: true), but summary.json records no "
                          "privacy accounting: no (epsilon, delta) guarantee is stated.")
REST_ENCRYPTION_ON = ("on (messages Fernet-encrypted, models and updates over 64 KiB AES-256-GCM, under keys agreed per "
                      "client)")
ENCRYPTION_OFF = "off (payloads were not encrypted by the application; whether TLS was used is not recorded)"
NOT_RECORDED = "not recorded"
EMPTY_CELL = "\u2014"  # an em dash: the cell is empty in history.csv (not evaluated / not private)

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 72em;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: 0.95em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; margin: 0.5em 0; }
p.note { color: #555; font-size: 0.9em; }
"""

HTML_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<h1>{title}</h1>
<p class="note">Generated from the files in this folder: {sources}.</p>
{body}
</body>
</html>
"""

__all__ = [
                             "CENTRALIZED_DATA_SENTENCE",
                             "CSS",
                             "DP_UNRECORDED_SENTENCE",
                             "EMPTY_CELL",
                             "ENCRYPTION_OFF",
                             "FEDERATED_DATA_SENTENCE",
                             "HTML_PAGE",
                             "NOT_RECORDED",
                             "NO_DP_SENTENCE",
                             "REST_DATA_SENTENCE",
                             "REST_ENCRYPTION_ON",
                             "UNKNOWN_MODE_SENTENCE",
]
