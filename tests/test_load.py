"""``nt.load`` on a local folder: the class that saved it, its weights, its points."""

from __future__ import annotations


def test_load_reads_a_local_folder_of_a_model_without_a_causal_head(tmp_path):
    import torch
    import transformers

    import neurotap as nt

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    transformers.BertModel(config).save_pretrained(tmp_path)
    expected = transformers.BertModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    model = nt.load(str(tmp_path))
    ids = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(1))
    assert type(model.module) is transformers.BertModel and model.tokenizer is None
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, expected(ids).last_hidden_state)
    assert "encoder.layer.1.attention.self.attention_interface.softmax" in model.points().names()
