"""The OpenAI-compatible HTTP server: a thin adapter from HTTP to the shared AsyncEngine.

app.py (FastAPI app, guards, errors), routes.py (the two generation endpoints), protocol.py
(request bodies), responses.py (response shapes), generation.py (running a request's choices),
tools.py (tool-call parsing), structured.py (JSON constrained decoding), metrics.py, page.html
(the web chat), cli.py (`qwen2 serve`).
"""
