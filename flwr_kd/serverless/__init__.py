"""The serverless runtime on Google Cloud, split by side of the wire.

- Shared by both sides: `names` (every object name and document path), `arraystore` (Cloud
  Storage; registers `gs://` client state), `callrecords` (what a function records of each
  call, create-only, in its own outbox), `wire` (messages over HTTP), `taskcodec` (fan-out
  tasks as arrays + JSON).
- Function side, inside the Cloud Functions: the `functions` package. It touches Cloud
  Storage only.
- Driver side: `grid` (`CloudFunctionGrid`), `trust` (what a reply may be believed),
  `cloudfanout`, `deployment` (where the functions are, are they ACTIVE), `roundstore`
  (Firestore, the driver's alone) and `invocations` (its invocation documents, from the call
  records), `driver`, `resume`, `summary`, `audit`. The driver side imports nothing of the
  function side.
- The whole stack on one machine: `emulators`, `emulate`, and what Google Cloud does that the
  emulators do not (`frontend`, `tokenservice`, `policy`, `storagegate`, `firestoregate`).

The core (`flwr_kd` outside this package) never imports it.
"""
