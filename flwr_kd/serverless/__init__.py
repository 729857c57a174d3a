"""The serverless runtime on Google Cloud, split by side of the wire.

- Shared by both sides: `names` (every object name and document path), `arraystore` (Cloud
  Storage; registers `gs://` client state), `roundstore` (Firestore), `wire` (messages over
  HTTP), `taskcodec` (fan-out tasks as arrays + JSON).
- Function side, inside the Cloud Functions: the `functions` package.
- Driver side: `grid` (`CloudFunctionGrid`), `cloudfanout`, `deployment` (where the functions
  are, are they ACTIVE), `driver`, `summary`, `audit`; and `emulators` / `emulate` for the
  whole stack on one machine. The driver side imports nothing of the function side.

The core (`flwr_kd` outside this package) never imports it.
"""
