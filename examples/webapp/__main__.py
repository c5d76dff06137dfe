"""``python -m examples.webapp``: serve the app with uvicorn on WEBAPP_HOST:WEBAPP_PORT (127.0.0.1:8000)."""

import uvicorn

from examples.webapp.app import WebappSettings

if __name__ == "__main__":
    settings = WebappSettings()
    uvicorn.run("examples.webapp.app:app", host=settings.host, port=settings.port)
