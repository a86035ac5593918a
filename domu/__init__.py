"""domu"""
