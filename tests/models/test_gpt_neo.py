"""GPT-Neo's storage layout checked by hand (the shared converter tests: test_converters.py)."""

import numpy as np
from conftest import hf_numpy_state_dict

from lowrank.models import config_from_hf, convert_gpt_neo_state_dict


def test_linear_layout_by_hand(gpt_neo_checkpoint):
    """nn.Linear stores [out, in]: head 1's queries are rows dh : 2*dh of q_proj."""
    state_dict = hf_numpy_state_dict(gpt_neo_checkpoint)
    tree = convert_gpt_neo_state_dict(state_dict, config_from_hf(gpt_neo_checkpoint.path))
    q_proj = state_dict["transformer.h.2.attn.attention.q_proj.weight"]
    np.testing.assert_array_equal(tree["blocks"]["attn"]["W_Q"][2, 1], q_proj[8:16].T)
    c_fc = state_dict["transformer.h.3.mlp.c_fc.weight"]
    np.testing.assert_array_equal(tree["blocks"]["mlp"]["W_in"][3], c_fc.T)
