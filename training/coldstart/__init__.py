"""Cold-start evaluation of the live catalogue (``genret coldstart``, docs/live_catalogue.md).

1. :func:`hold_out_items`: a share of the items (uniformly at random, ``seed``) and the data set
   without them; :func:`reduced_split`: the full data's split (same users in each part, same
   history / target cut) with the held-out items removed from everything the trainers see.
2. Each method trains on the reduced split (its SASRec base too) and exports its bundle, whose
   content tower is fitted on the reduced data's items only.
3. :func:`add_held_out` adds the held-out items to the bundle's catalogue through the live path
   (``Catalogue.apply``) with vectors from the content tower only (``vector=None``); an item none of
   whose attributes the tower knows cannot be added (counted; its targets stay misses).
4. :func:`catalogue_eval` scores the full data's test users on that catalogue at the bundle's
   default beam (widened per user as served), history excluded: held-out items in a history are
   not given to the encoder (it never saw them: skipped and counted) but are still excluded.
   "new items": the test users with a held-out item among their targets, scored on those targets
   only; "overall": every test user, every target.

References (:mod:`cli.coldstart`): SASRec on the full data, exhaustive, on the "new items" users
and targets; the method's full-data bundle, overall.

Modules: ``holdout`` (steps 1 and 3: the held-out items, the reduced split, the add through the
live path), ``scoring`` (step 4 and the references), ``run`` (:func:`run.run_coldstart`, every
step for each method, and the reuse of bundles trained before).
"""
