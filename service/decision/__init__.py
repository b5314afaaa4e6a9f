"""The decision path: admission, routing, the tiers' workers, reading an answer (probe or generation), verification and revision. No HTTP here."""
