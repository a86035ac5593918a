"""The backend drivers (Linux's drivers/*/xen-*back): netback, blkback and p9back, their data-path
workers and how those drop privilege. dom0 runs them today; a driver domain runs the same code.
"""
