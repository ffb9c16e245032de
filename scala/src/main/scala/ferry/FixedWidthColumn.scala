package ferry

import org.apache.arrow.vector.{BigIntVector, FieldVector, Float4Vector, Float8Vector, IntVector}
import org.apache.spark.sql.types.{DataType, Decimal, DoubleType, FloatType, IntegerType, LongType}
import org.apache.spark.sql.vectorized.{ArrowColumnVector, ColumnVector, ColumnarArray, ColumnarMap}
import org.apache.spark.unsafe.Platform
import org.apache.spark.unsafe.types.UTF8String

/**
 * A Spark column over a loaded Arrow bigint, double, int or float vector that reads its memory
 * directly. Spark's ArrowColumnVector goes through Arrow's checked accessors, which test the
 * buffer's reference count and bounds on every value and validity bit: with the Parquet writer
 * downstream reading every cell, those checks were a tenth of a compute pass. Rows come from a
 * [[org.apache.spark.sql.vectorized.ColumnarBatch]] of the vector's own row count, so indexes
 * are in range; the vector must stay loaded (the reader's contract: until the next `load`).
 */
private[ferry] final class FixedWidthColumn private (vector: FieldVector, dt: DataType)
    extends ColumnVector(dt) {

  private val data = vector.getDataBufferAddress
  private val validity = vector.getValidityBufferAddress
  private val nulls = vector.getNullCount

  override def close(): Unit = () // the reader owns and closes the vectors
  override def hasNull: Boolean = nulls > 0
  override def numNulls: Int = nulls
  override def isNullAt(rowId: Int): Boolean =
    nulls > 0 && (Platform.getByte(null, validity + (rowId >> 3)) & (1 << (rowId & 7))) == 0

  override def getLong(rowId: Int): Long = Platform.getLong(null, data + 8L * rowId)
  override def getDouble(rowId: Int): Double = Platform.getDouble(null, data + 8L * rowId)
  override def getInt(rowId: Int): Int = Platform.getInt(null, data + 4L * rowId)
  override def getFloat(rowId: Int): Float = Platform.getFloat(null, data + 4L * rowId)

  private def wrongType(what: String) =
    new UnsupportedOperationException(s"a $dt column has no $what values")
  override def getBoolean(rowId: Int): Boolean = throw wrongType("boolean")
  override def getByte(rowId: Int): Byte = throw wrongType("byte")
  override def getShort(rowId: Int): Short = throw wrongType("short")
  override def getArray(rowId: Int): ColumnarArray = throw wrongType("array")
  override def getMap(ordinal: Int): ColumnarMap = throw wrongType("map")
  override def getDecimal(rowId: Int, precision: Int, scale: Int): Decimal = throw wrongType("decimal")
  override def getUTF8String(rowId: Int): UTF8String = throw wrongType("string")
  override def getBinary(rowId: Int): Array[Byte] = throw wrongType("binary")
  override def getChild(ordinal: Int): ColumnVector = throw wrongType("child")
}

private[ferry] object FixedWidthColumn {

  /** The fastest Spark column over a loaded vector: direct for the four types above, else Spark's. */
  def of(vector: FieldVector): ColumnVector = vector match {
    case v: BigIntVector => new FixedWidthColumn(v, LongType)
    case v: Float8Vector => new FixedWidthColumn(v, DoubleType)
    case v: IntVector => new FixedWidthColumn(v, IntegerType)
    case v: Float4Vector => new FixedWidthColumn(v, FloatType)
    case other => new ArrowColumnVector(other)
  }
}
