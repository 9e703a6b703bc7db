"""The federated round, shaped like Flower's: the ServerApp entry and its resume (:mod:`.app`), a
strategy of verbs around one loop (:mod:`.strategy`), the three ways an update travels
(:mod:`.channels`, :mod:`.secagg_channel`), node transport (:mod:`.transport`), and one round in
progress with what it leaves in ``state.json`` (:mod:`.round`)."""
