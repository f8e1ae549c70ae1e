"""The gateway: the front door that routes every request down the cache-hit or -miss path."""
