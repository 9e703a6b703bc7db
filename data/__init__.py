"""The tasks shipped with Offsite, as package data: ``skill/`` (the default model has skill on them)
and ``bigbench/`` (four BIG-bench tasks it is at chance on, kept as a record). See each README."""
