"""Remote configuration: the desired document in, the reported document out (docs/fleet.md).

One job per module: :mod:`.document` (the signed document and its checks), :mod:`.state` (what
persists in the state directory), :mod:`.startup` (the effective config before anything runs),
:mod:`.health` (the health window), :mod:`.report` (the reported document), :mod:`.apply` (the
state machine that ties them together).
"""
