"""One router per concern: health, memories (publish, search, lookup), commands, audit."""
