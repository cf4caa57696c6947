"""Who may ask, and how often: proxy keys, the client's address behind trusted
proxies, and the token buckets (in memory or in Redis) a request is charged to.
"""
