"""llmpress: post-training compression of causal language models.

    import llmpress
    result = llmpress.compress("smollm2-135m", "gptq-w4-g64", out="out/smol-w4")
    model, tokenizer = llmpress.load("out/smol-w4")
    print(llmpress.perplexity(model, tokenizer, "wiki/test", windows=4))
"""

from .api import CompressResult, compress, evaluate, generate, load, perplexity
from .version import __version__

__all__ = ["CompressResult", "__version__", "compress", "evaluate", "generate", "load", "perplexity"]
