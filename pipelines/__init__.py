"""embedpipe's library: the batch pipeline, the store and search. serve/ and the CLI build on it."""

import logging

# Between INFO and WARNING: a one-time slow step a person should hear about (quantizing, measuring the
# backends), shown on the console without being a warning.
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")
