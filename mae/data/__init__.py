"""The data path: datasets (``loading``), images and their transforms (``images``), and the
``DataSource`` interface (``base``) with one class per kind of source: loaded through workers
(``loaded``), decoded once onto the device (``on_device``), streamed (``streamed``); ``sources``
picks one from the config."""
