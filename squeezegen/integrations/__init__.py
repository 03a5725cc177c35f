"""squeezegen's methods inside other inference engines (each integration imports its engine lazily)."""
