"""crawl2chat: from a raw web crawl to a chat assistant."""

__version__ = "0.1.0"
