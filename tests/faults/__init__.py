"""Fault injection: real processes, real local servers, the faults production sees."""
