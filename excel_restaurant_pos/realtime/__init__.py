"""The realtime push server of Excel Restaurant POS.

Run it with ``python -m excel_restaurant_pos.realtime``; publish to it from Python with
:mod:`excel_restaurant_pos.realtime.utils`. Importing this package has no side effects.
"""
