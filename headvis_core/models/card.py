"""The loaded model's card: its shape, and which query heads share a KV head."""

from headvis_core.models.loader import ModelInfo


def kv_group(head: int, info: ModelInfo) -> int:
    """The key/value head that query ``head`` reads under grouped-query attention."""
    return head // (info.n_heads // info.n_kv_heads)


def model_facts(info: ModelInfo) -> dict[str, str]:
    return {
        "Architecture": info.architecture,
        "Layers x query heads": f"{info.n_layers} x {info.n_heads} = {info.n_total_heads} heads",
        "Key/value heads per layer": (f"{info.n_kv_heads} (grouped-query: {info.n_heads // info.n_kv_heads} query "
                                      "heads share each)" if info.is_gqa else f"{info.n_kv_heads} (one per head)"),
        "d_model / d_head": f"{info.d_model} / {info.d_head}",
        "Vocabulary": f"{info.d_vocab:,}",
        "Context": f"{info.n_ctx:,} tokens",
        "Prepends BOS": "yes" if info.prepends_bos else "no",
        "Parameters": f"{info.n_params / 1e6:.1f}M",
        "Device / dtype": f"{info.device} / {info.dtype}",
        **({"Placement": f"{info.device_map} ({info.n_devices} devices)"} if info.device_map else {}),
        "Source": info.source,
    }
