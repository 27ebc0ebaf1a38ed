"""The offline shard builder: an image folder and a labels CSV become ArrayRecord shards and a manifest.

Read in this order:
  plan.py              options, the file listing and the CSV plan
  image.py             one image -> one record (or a skip reason)
  faces.py             the optional face step: face_landmarks.py (dlib detector, 68 points),
                       face_align.py (eyes level, the UTKFace framing), face_proportions.py and
                       landmark_points.py (labels)
  quality.py           a face's size, sharpness and head pose, for the quality filters
  writer.py            one shard file, and the out-folder safety checks
  build.py             the build over worker processes, and its command line

It imports only `data/`'s record, manifest and CSV modules below it, never the Grain pipeline: its
worker processes need PIL and the record format, not JAX.
"""
