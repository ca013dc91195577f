"""Old import path of the typed events: they live in the leaf module `k2mlx.events` (so the chat
package, the TUI and the server's mappers need not import the engine). Kept for callers."""
from k2mlx.events import *  # noqa: F401,F403
from k2mlx.events import __all__  # noqa: F401
