"""One router per area of docs/API.md."""
