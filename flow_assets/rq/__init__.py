"""dispatch="rq": enqueueing a page's jobs (``dispatch``), running them on workers
(``worker``), what a worker refuses (``guard``) and its ``rq worker -c`` settings."""
