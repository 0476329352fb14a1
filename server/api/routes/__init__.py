"""One router per area of API.md."""
