"""The core every layer stands on: errors, logging, running commands, the configuration, the
pinned versions, the content-addressed cache. It imports nothing from the layers above."""
