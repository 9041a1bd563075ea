"""Redis, the live side: a cache of the ledger for dedup and counters while a run goes
(``RedisCounters``), its Lua scripts (``lua``, ``lua_pages``, ``lua_rq``), key names
(``keys``) and the embedded server (``embedded_redis``)."""
