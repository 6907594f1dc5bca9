"""State the Responses API keeps: stored responses (``store.py``) and sealed reasoning (``seal.py``)."""
