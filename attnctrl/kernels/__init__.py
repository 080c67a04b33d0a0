"""The ground floor: pure tensor code that imports nothing from attnctrl but :mod:`attnctrl.errors`.

* :mod:`.attention`: attention primitives on 4-D tensors (SDPA with key biases, one softmax over several key/value
  blocks, query groups, attention with its log-sum-exp, exact merging of partial attentions, probabilities of
  selected rows or columns);
* :mod:`.local_attention`: CLEAR's local window attention (dense reference, tiled SDPA, flex attention);
* :mod:`.token_merge`: the bipartite token merging of agent attention.

``tests/test_import_rules.py`` checks that nothing here imports core, the processors or anything above them.
"""
