"""The example web app: submit a session, watch its stages, chat with its agent (README.md here)."""
