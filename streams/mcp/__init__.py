"""memstream as an MCP server (``memstream mcp``): tools and resources over the HTTP API."""
