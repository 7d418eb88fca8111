from llmtrain.data.loader import Corpus, WindowLoader, prepare_corpus
from llmtrain.data.sources import DataError, iter_documents
from llmtrain.data.tokenizer import Tokenizer, load_tokenizer, train_bpe

__all__ = [
    "Corpus",
    "DataError",
    "Tokenizer",
    "WindowLoader",
    "iter_documents",
    "load_tokenizer",
    "prepare_corpus",
    "train_bpe",
]
