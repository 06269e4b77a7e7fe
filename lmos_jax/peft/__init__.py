"""Parameter-efficient finetuning: LoRA, Houlsby adapters and AdaLoRA on any lmos model.

Config switch `peft.method` = full | lora | adapters | adalora (see `methods.py`); module
surgery and trainable-path predicates in `wrap.py`; one file per method.
"""
