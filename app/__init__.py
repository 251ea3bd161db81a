"""chatd: durable AI-agent chats on a shared PostgreSQL, driven by LISTEN and triggers."""
