"""The leaderboard: arena battles, votes and MT-bench scores in a store every gateway replica
shares (SQLite for one gateway, PostgreSQL for several), and the ratings computed from them."""
