"""Everything that talks to Kafka or to users, by layer (lower never imports higher):
``settings`` < ``transport`` < ``runtime`` < ``query`` < ``pipeline`` < ``api`` | ``sdk``
< ``cli``."""
