"""Prometheus Alertmanager: webhook notifications (version 4) in, silences out (API v2).

`payload.py` reads Alertmanager's webhook body, `intake.py` turns it into Events and
Cancellations, `silences.py` talks to the API v2 silences endpoint, `connector.py` ties them to
the connector contract.
"""
