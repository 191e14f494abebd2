"""GPT-2's storage layout checked by hand (the shared converter tests: test_converters.py)."""

import numpy as np
from conftest import hf_numpy_state_dict

from lowrank.models import config_from_hf, convert_gpt2_state_dict


def test_qkv_split_by_hand(gpt2_checkpoint):
    """Head 2's keys are columns d + 2*dh : d + 3*dh of the fused Conv1D c_attn."""
    state_dict = hf_numpy_state_dict(gpt2_checkpoint)
    tree = convert_gpt2_state_dict(state_dict, config_from_hf(gpt2_checkpoint.path))
    c_attn = state_dict["transformer.h.1.attn.c_attn.weight"]
    np.testing.assert_array_equal(tree["blocks"]["attn"]["W_K"][1, 2], c_attn[:, 32 + 16 : 32 + 24])
    c_proj = state_dict["transformer.h.1.attn.c_proj.weight"]
    np.testing.assert_array_equal(tree["blocks"]["attn"]["W_O"][1, 3], c_proj[24:32])
