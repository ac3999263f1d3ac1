"""The web UI served by the gateway at `/`: static chat, side-by-side and arena pages, and the
arena's JSON API (battles, votes, leaderboard)."""

from services.gateway.webui.routes import PUBLIC_PATHS, STATIC_DIR, install_webui

__all__ = ["PUBLIC_PATHS", "STATIC_DIR", "install_webui"]
