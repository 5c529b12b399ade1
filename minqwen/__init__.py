"""minqwen: the Qwen3.5 model family in readable NumPy, with Numba where it counts.

    >>> import minqwen
    >>> model = minqwen.load("path/to/checkpoint")
    >>> logits = model.forward([1, 2, 3])          # [3, vocab], fresh state
    >>> cache = model.new_cache()
    >>> model.forward([1, 2, 3], cache)            # prefill …
    >>> model.forward([4], cache, last_only=True)  # … then decode one token at a time
"""

from . import threads  # noqa: F401  (first: it sets OpenMP's spin before any kernel runs)
from .errors import MinqwenError
from .generate import ChatSession, generate, stream
from .model import Cache, Model, load
from .sampling import SamplingParams
from .threads import set_threads
from .tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["Cache", "ChatSession", "MinqwenError", "Model", "SamplingParams", "Tokenizer", "generate", "load",
           "set_threads", "stream", "__version__"]
