"""PostgreSQL: connections and the pool, the SQL of the API, the event record, the migrations
(sql/), the embedded server."""
