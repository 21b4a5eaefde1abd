"""The processors' wiring: MemReader as the one writer, the views, the audit, the Faust agents,
and which of them each ``memstream serve --role`` runs."""
