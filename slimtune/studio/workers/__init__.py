"""Worker processes the Studio starts: chat, export and the embedded tiny model (training uses ``slimtune train``)."""
