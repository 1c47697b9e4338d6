import logging
import re

import pytest
import torch
from transformers.utils import logging as hf_logging

# transformers announces renamed arguments and fields (5.24: `past_key_values` -> `cache`, `gradient_checkpointing_*`
# -> `activation_checkpointing_*`) through its own logger, once per process; the project must not trigger any.
DEPRECATION = re.compile(r"deprecat", re.IGNORECASE)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(autouse=True)
def no_transformers_deprecation_messages(request):
    """Fails a test in which transformers logs a deprecation (its Python warnings are errors, see pyproject.toml).
    `warning_once` remembers what it said, so it is cleared for each test to see every one."""
    hf_logging.warning_once.cache_clear()
    records = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(records)
    yield
    logger.removeHandler(records)
    said = [m for m in records.messages if DEPRECATION.search(m)]
    if said and not request.node.get_closest_marker("allow_deprecation"):
        pytest.fail(f"transformers logged a deprecation: {said[0]}")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds sync cost on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
