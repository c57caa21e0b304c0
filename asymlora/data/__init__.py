"""LLaVA-format conversation data, task mixtures, tokenisation with label masks, and collation.

Typical use by the trainer::

    from asymlora.data import DataCollator, Mixture

    mixture = Mixture.from_dict(cfg["data"], base_dir=".")        # validates everything
    train_ds, val_ds = mixture.datasets(processor)                 # lazy encoding
    loader = DataLoader(train_ds, batch_size=8, sampler=mixture.sampler(),
                        collate_fn=DataCollator.from_processor(processor))
    for batch in loader:
        mixture.summary.add_events(batch.pop("data_events"))
        task_ids = batch.pop("task_ids"); batch.pop("sample_ids")
        loss = model(**batch).loss
    print(mixture.summary.format())
    save(mixture.task_names)                                      # with the adapter
"""

from .collate import BATCH_KEYS, DataCollator
from .config import DatasetSpec, MixtureConfig
from .conversations import IMAGE_PLACEHOLDER, Conversation, Turn, iter_records, load_conversations, parse_record
from .dataset import SupervisedDataset
from .encode import IGNORE_INDEX, ConversationEncoder, EncodedSample
from .errors import REASONS, DataError, DataEvent, DataSummary
from .mixture import Mixture, load_mixture
from .sampling import MixtureSampler, allocate, weighted_draw

__all__ = [
    "BATCH_KEYS",
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "REASONS",
    "Conversation",
    "ConversationEncoder",
    "DataCollator",
    "DataError",
    "DataEvent",
    "DataSummary",
    "DatasetSpec",
    "EncodedSample",
    "Mixture",
    "MixtureConfig",
    "MixtureSampler",
    "SupervisedDataset",
    "Turn",
    "allocate",
    "iter_records",
    "load_conversations",
    "load_mixture",
    "parse_record",
    "weighted_draw",
]
